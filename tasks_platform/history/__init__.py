"""Job history: the schema, the recorder that fills it, and the queries that read it."""
