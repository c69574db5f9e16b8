from batch_gateway.cli import entry

entry()
