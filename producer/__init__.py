"""The light side of salient: submit jobs and read their results without torch."""
