"""The light side of salient: submit jobs and read their results without torch.

``producer.submit(sources, model=..., methods=..., ...)`` queues a job and returns its id.
"""

from .submit import build_spec, submit

__all__ = ["build_spec", "submit"]
