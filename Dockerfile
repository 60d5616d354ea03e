# One image for every penctl service of the compose stack (controller, ingest,
# simulated pens); the command picks the subcommand.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the package needs: tests, docs and the venv stay out (.dockerignore).
COPY pyproject.toml README.md ./
COPY firmware_protocol ./firmware_protocol
COPY controller ./controller
COPY simulated_pen ./simulated_pen
COPY devtools ./devtools
COPY penctl ./penctl
RUN pip install . \
    && useradd --system --create-home --home-dir /var/lib/penctl penctl

# Journal, audit log, outbox and dead letters live under /var/lib/penctl (a volume).
USER penctl
WORKDIR /var/lib/penctl
ENTRYPOINT ["penctl"]
CMD ["--help"]
