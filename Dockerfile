# The one Spectral image: `spectral serve` on port 8000 (the API and the workers in one
# process), with the example worlds it seeds on first start. The migrations are compiled into
# the binary; the image carries them as files too, for operators to read.
#
#   docker build --build-arg GIT_SHA="$(git rev-parse HEAD)" -t spectral .
#   docker run -p 8000:8000 -e DATABASE_URL=postgres://… spectral
#
# tests/it/image.rs replays the runtime stage below outside Docker (its files, environment,
# working directory, user, entrypoint and health check); keep them in step.

# ---- build ------------------------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src

# Dependencies first, against placeholder sources, so that this layer is rebuilt only when
# Cargo.toml or Cargo.lock change and not on every change to the code. The image builds only
# the binary, so the manifest's bench and test targets (whose files are not in the build
# context) are dropped from it first; the lock file does not depend on them.
COPY Cargo.toml Cargo.lock build.rs ./
RUN awk '/^\[\[(bench|test)\]\]/ { skip = 1; next } /^\[/ { skip = 0 } !skip' Cargo.toml > Cargo.bin.toml \
    && mv Cargo.bin.toml Cargo.toml \
    && mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin spectral \
    && rm -rf src

COPY src ./src
COPY migrations ./migrations

# The commit baked into the binary, reported on /health and /version. Declared after the
# dependency layer so that a new commit does not invalidate it.
ARG GIT_SHA=unknown
ENV SPECTRAL_GIT_SHA=${GIT_SHA}
# COPY keeps the files' own times, which are older than the placeholder build above; touch
# them so that cargo sees the real sources as new.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin spectral \
    && cp target/release/spectral /usr/local/bin/spectral \
    && mkdir -p /out/data

# ---- runtime ----------------------------------------------------------------------------
# glibc and libgcc (which the binary links), CA certificates and a non-root user; no shell,
# no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
ARG GIT_SHA=unknown
LABEL org.opencontainers.image.title="spectral" \
      org.opencontainers.image.revision="${GIT_SHA}"

COPY --from=build /usr/local/bin/spectral /usr/local/bin/spectral
COPY migrations /app/migrations
COPY predicates /app/predicates
# The only place the service writes: the embedded SQLite store, when DATABASE_URL is unset.
COPY --from=build --chown=65532:65532 /out/data /app/data

WORKDIR /app
ENV SPECTRAL_ADDR=0.0.0.0:8000 \
    SPECTRAL_DATA_DIR=/app/data \
    SPECTRAL_SEED_DIR=/app/predicates \
    SPECTRAL_LOG_FORMAT=json
USER 65532:65532
EXPOSE 8000

# No curl here: the binary checks itself, as a deploy's gate does, without a version to expect.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/spectral", "gate", "--url", "http://127.0.0.1:8000", "--timeout", "3s", "--interval", "1s"]

# Exec form: the service is PID 1 and receives SIGTERM itself, and drains before it exits.
ENTRYPOINT ["/usr/local/bin/spectral"]
CMD ["serve"]
