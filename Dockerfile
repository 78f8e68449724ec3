# recsvc server image. Build: docker build -t recsvc .
# Run:   docker run -p 50051:50051 -v $PWD/models/gowalla:/model:ro recsvc
#        (embedded Redis in /data), or pair it with Redis: docker compose up
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# CPU-only torch first, from the PyTorch CPU index (the PyPI wheel pulls CUDA).
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"

COPY pyproject.toml setup.py README.md ./
COPY proto ./proto
COPY recsvc ./recsvc
COPY generators ./generators
COPY loadtest ./loadtest
RUN pip install . && useradd --system --home /data recsvc && mkdir -p /data && chown recsvc /data

USER recsvc
ENV RECSVC_MODEL=/model RECSVC_DATA_DIR=/data RECSVC_PORT=50051
EXPOSE 50051
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s=g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')); sys.exit(s.Check(h.HealthCheckRequest(), timeout=2).status != 1)"
ENTRYPOINT ["recsvc", "serve"]
