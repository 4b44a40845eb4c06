"""Ground floor of salient: settings, metadata database, object stores and URI readers."""
