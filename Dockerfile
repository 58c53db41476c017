# Corral: one image for every process (`corral gateway`, `corral agent`, `corral nats`, ...).
#   docker build -t corral:0.1.0 .
#   docker run --rm -p 11434:11434 corral:0.1.0 gateway --host 0.0.0.0 --nats nats://HOST:4222
# The agent needs its GPU visible for live VRAM figures: see deploy/compose.yaml.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/corral
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
RUN /opt/corral/bin/pip install .

FROM python:3.11-slim
ENV PATH=/opt/corral/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/corral /opt/corral
RUN groupadd --system --gid 10001 corral \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/corral --create-home corral
USER 10001:10001
WORKDIR /var/lib/corral
# the gateway's default port; agents and NATS clients need no inbound port
EXPOSE 11434
STOPSIGNAL SIGTERM
ENTRYPOINT ["corral"]
CMD ["--help"]
