# The gateway's image: one uvicorn process (scale out with more containers, not workers).
#
#   docker build -t qwen-gateway .
#   docker run -p 8080:8080 -e UPSTREAMS=http://vllm-host:8000 -e GATEWAY_WINDOW=8 qwen-gateway
#
# Every setting is a flag or an environment variable (see gateway/settings.py); compose.yaml
# sets UPSTREAMS and GATEWAY_WINDOW. A custom task table: mount it and set GATEWAY_TASKS.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# pyproject.toml names README.md as the package's readme: setuptools needs it to build.
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install . && rm -rf /app/build

RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin gateway
USER 10001:10001

EXPOSE 8080
# /health answers while the process is alive; /ready (an upstream is usable) is for load
# balancers, not for restarting the gateway while vLLM is still loading.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2)"]

CMD ["python", "-m", "gateway", "--host", "0.0.0.0", "--port", "8080"]
