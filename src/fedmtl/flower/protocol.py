"""Names shared by the ServerApp and the ClientApp: message types, record keys, node-config keys.

Kept apart from both sides so the wire format is written down once and the two cannot drift."""

from __future__ import annotations

# Message types (Flower routes ``<category>.<action>`` to the ClientApp function registered for it).
QUERY = "query"  # handshake: which partition does this node hold, can it load it
TRAIN = "train"  # one client_step (optionally preceded by evaluating the previous round)
EVALUATE = "evaluate"  # evaluation only (clients not trained this round)

# Record keys in message contents.
RUN = "fedmtl.run"  # ConfigRecord: {"config": resolved config, "federation": its description} (JSON)
WORK = "fedmtl.work"  # ConfigRecord: {"cid", "round", "fraction", "lr"}: what the runtime grants
MSG = "fedmtl.msg"  # the algorithm's Message to the client (codec.put_message prefix)
REPLY = "fedmtl.reply"  # the algorithm's reply Message
EVAL = "fedmtl.eval"  # ConfigRecord: {"round"}; plus the server view under EVAL_VIEW (codec tree)
EVAL_VIEW = "fedmtl.eval.server"
EVAL_ROW = "fedmtl.eval.rows"  # codec tree: this client's evaluation rows (as evaluate_clients gives)
META = "fedmtl.meta"  # MetricRecord: {"cid", "compute_wall"}
NODE = "fedmtl.node"  # MetricRecord/ConfigRecord in the handshake reply
CHECK = "fedmtl.check"  # ConfigRecord in a handshake: build the run's node side now (checks its files)
NODE_ERROR = "fedmtl.node.error"  # ConfigRecord {"reason": one line}: why this node cannot run it
STATE = "fedmtl.state"  # codec tree prefix of the client state kept in ``context.state``

# node_config keys (``flower-supernode --node-config "partition-id=0 num-partitions=2"``).
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_DIR = "data-dir"
DATA_FILE = "data-file"
DATA_PATH = "data-path"  # this node's own client files (a .npz, a LEAF directory, a one-client store)
