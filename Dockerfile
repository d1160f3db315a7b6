# The image of k8s/rayservice.yaml: the project installed on Ray's CUDA image (Ray's version
# must match `rayVersion` in the manifest).
#   docker build -t ghcr.io/serve-app/serve-app:0.1.0 .
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/serve-app
COPY --chown=ray:users pyproject.toml README.md constraints.txt ./
COPY --chown=ray:users serve_app ./serve_app
COPY --chown=ray:users deployments ./deployments
COPY --chown=ray:users configs ./configs
RUN pip install --no-cache-dir -c constraints.txt . \
    && python -c "import serve_app.app, deployments.pipelines.sdxl, deployments.pipelines.esrgan"
