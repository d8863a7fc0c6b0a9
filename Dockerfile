# dnsdisco in a container: the embedded catalog and DNS, configured from /etc/dnsdisco.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY dnsdisco ./dnsdisco
RUN pip install '.[fast]' && rm -rf /src

# 8600 and 8500 are above 1024, so the non-root user needs no extra capability.
RUN useradd --system --uid 10001 --home-dir /var/lib/dnsdisco --create-home dnsdisco \
    && mkdir -p /etc/dnsdisco \
    && chown dnsdisco /var/lib/dnsdisco
COPY config/agent.json /etc/dnsdisco/agent.json
USER dnsdisco
WORKDIR /var/lib/dnsdisco
VOLUME /var/lib/dnsdisco

EXPOSE 8600/udp 8600/tcp 8500/tcp

HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8500/health', timeout=2).status == 200 else 1)"]

# Inside the container only, listen on every interface so published ports reach the agent;
# outside, the default stays 127.0.0.1. -client keeps HTTP and DNS on the same address.
ENTRYPOINT ["dnsdisco", "agent", "-config-dir", "/etc/dnsdisco", "-data-dir", "/var/lib/dnsdisco", "-client", "0.0.0.0"]
