# Serving image for KubeRay (k8s/): the official Ray image of the project's Ray version plus the
# project. No weights inside: pods read them from a volume (k8s/weights). Build from the repo root:
#   docker build -t REGISTRY/srpo-serve:TAG .
# Tags follow {ray version}-{python}-{platform}; "gpu" is Ray's alias for its default CUDA build.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# torch's PyPI wheel for Linux brings its own CUDA runtime libraries; the node needs an NVIDIA
# driver new enough for them (python -c "import torch; print(torch.version.cuda)" tells which).
# Pinned to the version the test suite runs, in its own layer: code changes do not re-download it.
ARG TORCH_VERSION=2.13.0
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}"

WORKDIR /home/ray/srpo-serve
COPY --chown=ray:users pyproject.toml README.md settings.py cli.py ./
COPY --chown=ray:users api ./api
COPY --chown=ray:users models ./models
COPY --chown=ray:users safety ./safety
COPY --chown=ray:users scheduling ./scheduling
COPY --chown=ray:users server ./server
COPY --chown=ray:users deployments ./deployments
# Ray is already in the image at the pinned version, torch above: this adds the rest and the project.
RUN pip install --no-cache-dir ".[gpu,s3]" && python -c "import deployments.app, cli"
