# syntax=docker/dockerfile:1
# shard-router and the rebalancer in a small image.
#   docker build -t shard-router .
#   docker run -d --name shard-router -p 6432:6432 -p 8080:8080 \
#       -v /etc/shard-router:/etc/shard-router:ro shard-router
# config.csv must listen on all interfaces inside the container: router-listen,0.0.0.0:6432 (and
# router-http,0.0.0.0:8080 for /metrics and the health endpoint). `docker stop` sends SIGTERM: the router
# drains for up to router-shutdown-timeout-s (30 s by default), so give it --time 45 (docker stop -t 45).
# The rebalancer: docker run --rm -v /etc/shard-router:/etc/shard-router:ro --entrypoint rebalance \
#       shard-router --config /etc/shard-router/config.csv report

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p router -p rebalancer \
    && install -m 0755 target/release/shard-router target/release/rebalance /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin shard-router \
    && mkdir -p /etc/shard-router
COPY --from=build /usr/local/bin/shard-router /usr/local/bin/rebalance /usr/local/bin/
USER shard-router:shard-router
EXPOSE 6432
STOPSIGNAL SIGTERM
ENTRYPOINT ["shard-router"]
CMD ["serve", "--config", "/etc/shard-router/config.csv"]
