# syntax=docker/dockerfile:1
# Build stage: the wheel and its dependencies are built here, so no compiler reaches the runtime image.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels . \
    && pip wheel --no-cache-dir --wheel-dir /wheels-snapshots ".[snapshots]"

# Runtime: slim, non-root, nothing written at run time (works with a read-only root filesystem).
# git is not needed to proxy git traffic, so it is not here.
FROM python:3.11-slim AS runtime
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin proxy
USER 10001
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
EXPOSE 8080 9090
# `healthcheck` finds the port the way `serve` does (its flags, GIT_TOKEN_PROXY_* variables, the config file), so a
# proxy moved to another port, or with its probes on server.metricsPort, stays healthy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=5s --retries=3 \
    CMD ["git-token-proxy", "healthcheck", "--timeout", "3"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["git-token-proxy"]
CMD ["serve", "--config", "/etc/git-token-proxy/config.yaml"]

# Demo: the runtime plus git, for `docker run --rm --tmpfs /tmp git-token-proxy:demo`.
FROM runtime AS demo
USER 0
# Debian's git is the one git-http-backend the demo needs; pinning its version would break on every point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
USER 10001
HEALTHCHECK NONE
CMD ["demo"]

# Mirror: the runtime plus git, for `mirror.dir` (`docker build --target mirror .`), with the S3 client for
# `mirror.snapshots`. The mirrors need a writable volume at mirror.dir; everything else stays read-only.
FROM runtime AS mirror
USER 0
COPY --from=build /wheels-snapshots /wheels
# hadolint ignore=DL3008
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/cache/git-token-proxy \
    && chown 10001 /var/cache/git-token-proxy
USER 10001
VOLUME ["/var/cache/git-token-proxy"]

# The default target stays the runtime image.
FROM runtime
