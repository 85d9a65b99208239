# autocert as a container: `docker build -t autocert .`, then `docker run autocert serve ...`.
# docker-compose.yml at the top of the repository runs it with Pebble, PostgreSQL and a demo app.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AUTOCERT_HOME=/var/lib/autocert

WORKDIR /src
# Only what `pip install .` needs (pyproject.toml names README.md as the long description;
# the Alembic migrations are packaged into the wheel).
COPY pyproject.toml README.md ./
COPY autocert ./autocert
COPY migrations ./migrations
RUN pip install . \
    && rm -rf /src \
    && useradd --system --home-dir /var/lib/autocert --shell /usr/sbin/nologin autocert \
    && install -d -o autocert -g autocert -m 0700 /var/lib/autocert

WORKDIR /var/lib/autocert
USER autocert
VOLUME ["/var/lib/autocert"]
# Docker lets unprivileged users bind ports below 1024 inside the container.
EXPOSE 80 443
STOPSIGNAL SIGTERM
ENTRYPOINT ["autocert"]
CMD ["serve"]
