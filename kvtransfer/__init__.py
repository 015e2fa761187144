"""splitserve.kvtransfer."""
