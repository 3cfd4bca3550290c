"""One module per transport; podipc.channel.REGISTRY names them, and a module never imports another."""
