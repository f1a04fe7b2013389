"""One FastAPI app per benchmark case, all with the same route: GET /ping -> {"ok": true}."""
