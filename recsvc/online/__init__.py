"""Online metrics (#13): the impression log, A/B variants and interleaving, the
attribution of feedback to impressions, and ``recsvc report``."""
