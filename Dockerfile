# syntax=docker/dockerfile:1
# One image recipe for every quantmesh stage, built from the repository root so it can include
# libs/common:
#
#   docker build --build-arg SERVICE=risk -t quantmesh-risk .
#
# SERVICE names a folder under services/. The image runs `quantmesh-$SERVICE` as uid 10001.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_VERSION=0.13.9

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# ---------------------------------------------------------------- builder --
FROM ${PYTHON_IMAGE} AS builder
ARG SERVICE
COPY --from=uv /uv /usr/local/bin/uv

# Compile bytecode now (the runtime filesystem may be read-only), copy rather than hardlink out
# of the cache mount, and never let uv fetch its own interpreter: the venv must point at this
# image's python, which the runtime stage shares.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv

WORKDIR /src
RUN test -n "${SERVICE}" || { echo "build with --build-arg SERVICE=<folder under services/>" >&2; exit 1; }
COPY . .
RUN test -f "services/${SERVICE}/pyproject.toml" \
    || { echo "SERVICE=${SERVICE}: no services/${SERVICE}/pyproject.toml" >&2; exit 1; }

# --no-editable installs the workspace packages (the stage and quantmesh-common) into the venv as
# wheels, so the runtime stage needs the venv only, not the source tree.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --package "quantmesh-${SERVICE}"

# A fixed entrypoint name, because an exec-form ENTRYPOINT cannot expand ${SERVICE}; the stage's
# default port read from its config.py (the one place it is defined), for the healthcheck; and the
# SQL migrations, which the quantmesh-common wheel does not carry, for `quantmesh-migrate`.
RUN ln -s "quantmesh-${SERVICE}" /app/.venv/bin/quantmesh-service \
    && /app/.venv/bin/python -c "import quantmesh_${SERVICE}.config as c; print(c.DEFAULT_HTTP_PORT)" \
       > /app/http-port \
    && cp tools/healthcheck.py /app/healthcheck.py \
    && cp -r libs/common/migrations /app/migrations

# ---------------------------------------------------------------- runtime --
FROM ${PYTHON_IMAGE} AS runtime
ARG SERVICE

RUN groupadd --system --gid 10001 quantmesh \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /app quantmesh

# Owned by root and read-only to the service user: the process cannot rewrite its own code.
COPY --from=builder /app /app

ENV PATH=/app/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    QM_MIGRATIONS_DIR=/app/migrations \
    QM_SERVICE=${SERVICE}

LABEL org.opencontainers.image.title="quantmesh-${SERVICE}"

WORKDIR /app
USER 10001:10001

# Slim has no curl: the check is python urllib against /healthz on $QM_HTTP_PORT, or on the
# stage's default port when the variable is not set.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/app/healthcheck.py"]

ENTRYPOINT ["quantmesh-service"]
