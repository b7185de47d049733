"""Federated training on Flower: ClientApp, ServerApp, strategies, annealing, checkpoints.

Simulation (one process, Ray on loopback, one virtual SuperNode per client of the partition)::

    fedasr federate hparams/fl/cross_silo.yaml --mode cross-silo --partition PART --seed-checkpoint SEED \\
        --output-dir OUT [--set rounds=10 --set strategy.temperature=0.05] [--resume]

Deployment Engine (the same apps; shown on loopback, one SuperNode per silo; the paths must exist where the
ServerApp and each ClientApp run: a SuperNode can name its own data with ``partition=/its/partition.json`` in
``--node-config``). TLS with certificates from ``scripts/make_certificates.sh`` and SuperNode authentication
(only registered public keys may join), exactly as tests/integration/test_deployment_security.py runs it::

    export FLWR_HOME=$PWD/.flwr FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
    scripts/make_certificates.sh certs --supernodes 2
    mkdir -p $FLWR_HOME && cat > $FLWR_HOME/config.toml <<EOF
    [superlink]
    default = "deploy"
    [superlink.deploy]
    address = "127.0.0.1:9093"
    root-certificates = "$PWD/certs/ca.crt"
    EOF
    flower-superlink --ssl-ca-certfile certs/ca.crt --ssl-certfile certs/server.pem --ssl-keyfile certs/server.key \\
        --enable-supernode-auth --disable-runtime-dependency-installation --port 9093 &
    flwr supernode register certs/supernodes/supernode-0.pub deploy
    flwr supernode register certs/supernodes/supernode-1.pub deploy
    flower-supernode --superlink 127.0.0.1:9093 --root-certificates certs/ca.crt --port 9100 \\
        --auth-supernode-private-key certs/supernodes/supernode-0 --node-config "partition-id=0 num-partitions=2" &
    flower-supernode --superlink 127.0.0.1:9093 --root-certificates certs/ca.crt --port 9101 \\
        --auth-supernode-private-key certs/supernodes/supernode-1 --node-config "partition-id=1 num-partitions=2" &
    cat > run_config.toml <<EOF
    hparams = "/abs/hparams/fl/cross_silo.yaml"
    partition = "/abs/PART"
    seed-checkpoint = "/abs/SEED"
    output-dir = "/abs/OUT"
    dev-manifest = "/abs/manifests/dev.csv"
    test-manifest = "/abs/manifests/test.csv"
    num-clients = 2
    overrides = '{"rounds": 10}'
    EOF
    flwr run . deploy --run-config run_config.toml --stream

Without TLS (tests/integration/test_federated.py): ``--insecure`` on the SuperLink and every SuperNode, no key
flags, no registration, and ``insecure = true`` instead of ``root-certificates`` in config.toml.

Faults on the Deployment Engine: a SuperNode that dies mid-round is answered for by the SuperLink with a
NODE_UNAVAILABLE error once its heartbeats stop (30-60 s); the round closes without it (``dropped`` in
metrics.jsonl) and the next one waits for every silo (min_available_nodes = num-clients). Restarted with the same
key once that round has closed, it keeps its node id and trains again. A ServerApp that dies: ``flwr stop RUN_ID
deploy``, then the same ``flwr run`` with ``resume = true`` in the run config continues after the last complete
round.

Outputs in OUT: metrics.jsonl (one line per round; round 0 = the seed), summary.json, best_model.pt and
final_model.pt ({"state_dict", "round", "dev_wer"}: load into the seed's ASRSystem), checkpoints/server_state.pt
(the resumable state of the last complete round), fl_config.json (the resolved settings), energy.json.
"""
