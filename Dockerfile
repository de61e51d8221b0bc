# otrace as a container: one Python file, its packages, a non-root user and a /data volume.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TRACE_DB_PATH=/data/openclaw-trace.db

RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin otrace \
    && mkdir -p /data /app && chown otrace:otrace /data

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir --disable-pip-version-check -r requirements.txt
COPY otrace.py prices.json prices.LICENSE LICENSE ./
# Run as a module from its compiled form: compiling otrace.py at every start leaves MiBs more resident.
RUN python -m compileall -q otrace.py

USER otrace
VOLUME ["/data"]
EXPOSE 9090 4318
STOPSIGNAL SIGTERM
# /health where otrace listens: TRACE_HOST, or loopback when that is every address (0.0.0.0, ::)
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import os, urllib.request; h = os.environ.get('TRACE_HOST', '127.0.0.1'); h = '127.0.0.1' if h in ('0.0.0.0', '::') else h; urllib.request.urlopen('http://%s:%s/health' % ('[%s]' % h if ':' in h else h, os.environ.get('TRACE_PORT', '9090')), timeout=2)"

ENTRYPOINT ["python", "-m", "otrace"]
CMD ["serve"]
