-- sni-router: the namespace tables that the PostgreSQL source's `query: default` reads.
--
-- Modelled on orama's namespace_webrtc_config and webrtc_port_allocations: a namespace has WebRTC
-- enabled (or not) and stealth enabled (or not); each node that runs the namespace's TURN server
-- has a port allocation of service type 'turn' with the TURN server's TLS port on that node.
-- Apply with:  psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f sql/schema.sql   (idempotent)
--
-- The mapping the default query makes, for the router on node `params.node_id`:
--
--   every namespace_webrtc_config row with enabled true (boolean true, or integer 1), joined with
--   the webrtc_port_allocations row of the same namespace_cluster_id, service_type = 'turn' and
--   node_id = params.node_id, is one namespace, routed under each name of the source's `names`
--   templates ({namespace} = namespace_name, {<param>} = params.<param>); without `names`:
--
--     cdn.ns-<namespace_name>.<base_domain>   alpn none: only a client offering no ALPN (a WebRTC
--                                             TURN client) reaches TURN; browsers and probers get
--                                             the fallback's real site (the deployment guide's name)
--     turn.ns-<namespace_name>.<base_domain>  alpn from stealth_enabled (the namespace service's DNS name)
--
--   each to backend turn-<namespace_name> at <params.backend_host, default 127.0.0.1>:<turn_tls_port>.
--   A template without its own alpn takes it from stealth_enabled: true -> none, false -> no condition.
--
-- The default query reads namespace_name, namespace_cluster_id, enabled and (where the table has
-- it) stealth_enabled, and node_id, namespace_cluster_id, service_type and turn_tls_port, so it
-- works unchanged on the namespace service's own tables: there `enabled` is an INTEGER 0/1 and
-- there is no stealth_enabled column (a template without alpn then has no condition). Those tables
-- need the NOTIFY function and the two triggers below for `listen_channel` to see changes.
--
-- A disabled namespace, one without a 'turn' allocation on this node, or one whose allocation has
-- no turn_tls_port yields no route (the last one is reported as an invalid entry and skipped).
-- Namespace names are used as a DNS label: letters (compared lowercased), digits and '-', not at
-- either end, at most 63 characters; a namespace whose name is not one is skipped and counted, and
-- so is a name too long to be a DNS name (a label over 63 characters); the others still apply.
--
-- Every INSERT, UPDATE, DELETE or TRUNCATE of either table NOTIFYs the channel sni_router_routes,
-- which a router configured with `listen_channel: sni_router_routes` reads at once.

CREATE TABLE IF NOT EXISTS namespace_webrtc_config (
    id                   text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    namespace_cluster_id text NOT NULL UNIQUE,
    namespace_name       text NOT NULL UNIQUE,
    enabled              boolean NOT NULL DEFAULT true,
    -- For a name template without alpn: true = only ALPN-less clients reach TURN under that name.
    stealth_enabled      boolean NOT NULL DEFAULT false,
    enabled_at           timestamptz NOT NULL DEFAULT now(),
    disabled_at          timestamptz
);

CREATE TABLE IF NOT EXISTS webrtc_port_allocations (
    id                    text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    node_id               text NOT NULL,
    namespace_cluster_id  text NOT NULL,
    service_type          text NOT NULL CHECK (service_type IN ('sfu', 'turn')),
    -- SFU ports (service_type = 'sfu'); not read by the router.
    sfu_signaling_port    integer,
    sfu_media_port_start  integer,
    sfu_media_port_end    integer,
    -- TURN ports (service_type = 'turn'); the router dials turn_tls_port.
    turn_listen_port      integer,
    turn_tls_port         integer CHECK (turn_tls_port BETWEEN 1 AND 65535),
    turn_relay_port_start integer,
    turn_relay_port_end   integer,
    allocated_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (node_id, namespace_cluster_id, service_type)
);

CREATE INDEX IF NOT EXISTS webrtc_port_allocations_node ON webrtc_port_allocations (node_id, service_type);

-- One notification per statement (not per row): the payload is only a hint, since the router
-- re-reads everything it routes on any notification.
CREATE OR REPLACE FUNCTION sni_router_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sni_router_routes', TG_TABLE_NAME || ' ' || TG_OP);
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER namespace_webrtc_config_notify
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON namespace_webrtc_config
    FOR EACH STATEMENT EXECUTE FUNCTION sni_router_notify();

CREATE OR REPLACE TRIGGER webrtc_port_allocations_notify
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON webrtc_port_allocations
    FOR EACH STATEMENT EXECUTE FUNCTION sni_router_notify();
