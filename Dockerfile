# Runtime image for hivlp: the KFP components run in it (base_image), and `hivlp` is its entry point.
# Installs from the same lock file with the same set-up script as a local `make setup`, so the two
# cannot drift. Build: docker build -t hivlp:0.1.0 .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HIVLP_VENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends git libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first (cached layer): only the lock and the set-up script.
COPY requirements/lock.txt requirements/lock.txt
COPY requirements/models.txt requirements/models.txt
COPY pyproject.toml README.md ./
COPY scripts/setup.sh scripts/install_browser.sh scripts/
COPY hivlp/ hivlp/
COPY configs/ configs/
RUN PYTHON=python3.11 HIVLP_SKIP_DATA=1 HIVLP_SKIP_BROWSER=1 HIVLP_EDITABLE=0 bash scripts/setup.sh

RUN useradd --create-home --uid 1000 hivlp && mkdir -p /app/outputs && chown -R hivlp:hivlp /app
USER hivlp

ENTRYPOINT ["hivlp"]
CMD ["--help"]
