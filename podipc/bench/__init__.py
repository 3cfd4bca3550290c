"""podipc bench: compare channels inside one pod."""
