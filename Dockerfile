# pgmirror in the official PostgreSQL image: one image for the partner
# containers (which run PostgreSQL beside the agent), the witness and the
# proxy. Used by docker-compose.yml; build context is the repository root.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY tests ./tests
RUN cargo build --release --locked --bin pgmirror

FROM postgres:16-bookworm
COPY --from=build /src/target/release/pgmirror /usr/local/bin/pgmirror
COPY docker/partner-entrypoint.sh /usr/local/bin/pgmirror-partner
RUN chmod 0755 /usr/local/bin/pgmirror-partner \
    && mkdir -p /var/lib/pgmirror \
    && chown postgres:postgres /var/lib/pgmirror
ENV PATH=/usr/lib/postgresql/16/bin:$PATH
# The agent is the container's main process; it runs PostgreSQL itself (as
# the postgres user), so the image's own entrypoint is not used.
ENTRYPOINT []
CMD ["pgmirror", "--help"]
