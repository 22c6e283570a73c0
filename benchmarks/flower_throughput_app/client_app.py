"""Flower ClientApp: local SGD on this SuperNode's partition (``node_config['partition-id']``)."""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flower_throughput_app.task import client_rng, load_partition, make_net, train

app = ClientApp()


@app.train()
def fit(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    partition = int(context.node_config["partition-id"])
    x, y = load_partition(str(cfg["data-path"]), partition)
    net = make_net(json.loads(str(cfg["model"])))
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    rng = client_rng(int(cfg["seed"]), int(cfg["server-round"]), partition)
    loss = train(net, x, y, float(cfg["epochs"]), int(cfg["batch-size"]), float(cfg["lr"]), rng)
    content = RecordDict(
        {
            "arrays": ArrayRecord(net.state_dict()),
            "metrics": MetricRecord({"train_loss": loss, "num-examples": len(y)}),
        }
    )
    return Message(content=content, reply_to=msg)
