"""``just cluster``: Keel's production topology started from local binaries on 127.0.0.1 (``topology``), the
properties only several processes can show (``proofs``), and the command that runs both (``__main__``)."""
