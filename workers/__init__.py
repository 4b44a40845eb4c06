"""The heavy side of salient: models, explanation methods and the engine that runs them."""
