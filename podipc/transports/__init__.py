"""One module (or small package) per transport, each ending with its `TRANSPORT` descriptor.

podipc.transport discovers them here; nothing lists them by hand. A transport never
imports another: what two share lives in a base they both import (podipc.stream).
"""
