"""The fedmtl Flower app: thin modules that build the ServerApp and ClientApp from fedmtl."""
