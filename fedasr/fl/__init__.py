"""Federated training on Flower: ClientApp, ServerApp, strategies, annealing, checkpoints.

Simulation (one process, Ray on loopback, one virtual SuperNode per client of the partition)::

    fedasr federate hparams/fl/cross_silo.yaml --mode cross-silo --partition PART --seed-checkpoint SEED \\
        --output-dir OUT [--set rounds=10 --set strategy.temperature=0.05] [--resume]

Deployment Engine (the same apps; shown on loopback, one SuperNode per silo; the paths must exist where the
ServerApp and each ClientApp run: a SuperNode can name its own data with ``partition=/its/partition.json`` in
``--node-config``)::

    export FLWR_HOME=$PWD/.flwr FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
    printf '[superlink]\\ndefault = "deploy"\\n\\n[superlink.deploy]\\naddress = "127.0.0.1:9093"\\ninsecure = true\\n' \\
        > $FLWR_HOME/config.toml
    flower-superlink --insecure --disable-runtime-dependency-installation --port 9093 &
    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9100 --node-config "partition-id=0 num-partitions=2" &
    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9101 --node-config "partition-id=1 num-partitions=2" &
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

Outputs in OUT: metrics.jsonl (one line per round; round 0 = the seed), summary.json, best_model.pt and
final_model.pt ({"state_dict", "round", "dev_wer"}: load into the seed's ASRSystem), checkpoints/server_state.pt
(the resumable state of the last complete round), fl_config.json (resolved settings, simulation).
"""
