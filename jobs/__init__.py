"""padistill's entry points, one module per job (`padistill <job>` or `python -m jobs.<module>`)."""

import os

# transformers warns at import that it falls back to PIL image processors without torchvision; padistill
# loads none (its workers get the same setting: pipeline.cluster.WORKER_ENV)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pipeline.cluster import quiet_driver  # noqa: E402  (before anything imports Ray)

quiet_driver()
