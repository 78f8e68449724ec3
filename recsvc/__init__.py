"""recsvc: a recommendation microservice."""
