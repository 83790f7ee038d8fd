# App image for api, worker, beat, flower and the one-shot migration (see docker-compose.yml).
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv PATH="/opt/venv/bin:$PATH"
RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /app
# Dependencies first (cached layer), from the lock file only.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY worker ./worker
COPY api_stub ./api_stub
RUN uv sync --frozen --no-dev \
    && useradd --system --uid 10001 app
USER app
EXPOSE 8000 5555
CMD ["uvicorn", "api_stub.app:app", "--host", "0.0.0.0", "--port", "8000"]
