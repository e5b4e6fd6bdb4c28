# The image of the example services (docker-compose.yml, profile "services"):
#   docker compose --profile services up -d --build
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . .
RUN pip install ".[prometheus,outbox]" \
    && useradd --system --no-create-home --home-dir /app mqkit

# `python -m examples.<name>` finds the examples package in /app, the working directory.
USER mqkit
CMD ["python", "-m", "examples.demo"]
