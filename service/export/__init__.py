"""`postcall export`: every matching record, oldest start first, as JSON lines, CSV or Parquet, in constant memory:
the streaming read (`query`), the formats (`formats`), and the command behind the argument parsing (`command`)."""
