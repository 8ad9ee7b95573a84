# syntax=docker/dockerfile:1
# sni-router container: Node.js 24 runs the TypeScript sources directly (type stripping), so there is
# no build step: one stage resolves production dependencies, the runtime stage copies them in.
#   docker build -t sni-router .
#   docker run --rm -p 443:443 -v ./sni-router.yaml:/etc/sni-router/sni-router.yaml:ro sni-router
#
# The image runs the Node.js the tests run: both stages name the exact version package.json pins
# (engines.node and the `node` devDependency), and test/runtime.test.ts fails when they part.
# The digest pins the whole image (Debian layers included), so a rebuild of the tag changes
# nothing here. It was not read from the registry (the machine this was written on cannot reach
# it): it is the node:24.21.0-slim digest that independent projects' digest-updating bots pinned
# last, after the two earlier builds of the same tag (sha256:2fe369e9..., then sha256:0e0ff40c...).
# A digest resolves only to an image the official repository published, and a wrong one fails the
# build (manifest unknown) rather than running something else. To check or move it:
#   docker buildx imagetools inspect node:24.21.0-slim     (the Digest line)
# and change both FROM lines together.

# --- dependencies: production only, exactly as locked ---------------------------------------------
FROM node:24.21.0-slim@sha256:b96009b6b18dc15ae52781abe71029198436d556149f441a11a44a706055c3a5 AS deps
WORKDIR /app
COPY package.json package-lock.json ./
# No install scripts: no production dependency needs one (and devDependencies, which pin a Node
# binary and the type checker, are left out).
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund \
 && npm cache clean --force

# --- runtime -----------------------------------------------------------------------------------------
FROM node:24.21.0-slim@sha256:b96009b6b18dc15ae52781abe71029198436d556149f441a11a44a706055c3a5 AS runtime
ENV NODE_ENV=production
WORKDIR /app

# An unprivileged user of its own (uid 10001) and the directory it writes (the postgres source's
# cache). A certwatch copy_to directory is a volume the operator mounts writable for uid 10001.
RUN groupadd --system --gid 10001 sni-router \
 && useradd --system --uid 10001 --gid sni-router --home-dir /var/lib/sni-router --no-create-home \
      --shell /usr/sbin/nologin sni-router \
 && mkdir -p /etc/sni-router /var/lib/sni-router \
 && chown sni-router:sni-router /var/lib/sni-router \
 && chmod 0750 /var/lib/sni-router

COPY --from=deps /app/node_modules ./node_modules
COPY package.json ./
COPY bin ./bin
COPY src ./src

USER sni-router:sni-router
# Ports below 1024 need no capability: Docker sets net.ipv4.ip_unprivileged_port_start=0 in the
# container's network namespace (docker-compose.yml also sets it, for older engines).
EXPOSE 443 9180
VOLUME ["/var/lib/sni-router"]

# Liveness from inside the container: the admin port answers (admin.listen must be on loopback or
# a wildcard address; the default 127.0.0.1:9180 is fine).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:9180/healthz').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]

# SIGTERM drains for shutdown_grace: give `docker stop` a longer timeout (-t 45, or
# stop_grace_period in compose).
STOPSIGNAL SIGTERM
# --disable-sigusr1: SIGUSR1 would open the inspector to whoever can signal the process.
ENTRYPOINT ["node", "--disable-sigusr1", "--max-semi-space-size=8", "src/cli.ts"]
CMD ["run", "--config", "/etc/sni-router/sni-router.yaml"]
