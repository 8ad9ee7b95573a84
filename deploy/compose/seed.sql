-- Demo data for the compose stack (runs after sql/schema.sql on the first start of the database):
-- namespace "demo" with stealth TURN on node-1, port 5349. The router's postgres source turns it
-- into the routes  cdn.ns-demo.example.com and turn.ns-demo.example.com, both alpn none (the first
-- always, the second for stealth_enabled) -> coturn:5349.
INSERT INTO namespace_webrtc_config (namespace_cluster_id, namespace_name, enabled, stealth_enabled)
VALUES ('cluster-demo', 'demo', true, true)
ON CONFLICT (namespace_cluster_id) DO NOTHING;

INSERT INTO webrtc_port_allocations (node_id, namespace_cluster_id, service_type, turn_listen_port, turn_tls_port)
VALUES ('node-1', 'cluster-demo', 'turn', 3478, 5349)
ON CONFLICT (node_id, namespace_cluster_id, service_type) DO NOTHING;
