# The streamsync worker image: `docker build -t streamsync .`
# Configuration is not baked in: mount it at /etc/streamsync/streamsync.yaml (docker-compose.yml
# does), and pass credentials through STREAMSYNC_REDIS_URL.
FROM python:3.11-slim

# STREAMSYNC_CONFIG: every command finds the mounted configuration without -c, so that
# `docker compose exec worker streamsync status` just works.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STREAMSYNC_CONFIG=/etc/streamsync/streamsync.yaml

# Only what the wheel is built from (see pyproject.toml): the package, its Lua library, and the
# README the project metadata names.
COPY pyproject.toml README.md /tmp/streamsync-src/
COPY streamsync /tmp/streamsync-src/streamsync
COPY lua /tmp/streamsync-src/lua
RUN pip install --no-cache-dir /tmp/streamsync-src \
    && rm -rf /tmp/streamsync-src

# Numeric, so that an orchestrator can check it is not root (Kubernetes runAsNonRoot).
RUN groupadd --system --gid 10001 streamsync \
    && useradd --system --uid 10001 --gid streamsync --no-create-home --shell /usr/sbin/nologin streamsync
USER 10001:10001

# The worker finishes and acknowledges the batch in hand on SIGTERM, then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["streamsync"]
CMD ["run", "-c", "/etc/streamsync/streamsync.yaml"]
