"""Code common to both services, in four families:

shared.rpc        the RPC kit: server, request path (decoding, token check, errors,
                  access log, metrics), tracing, logs, the service entry point
shared.security   access tokens: verification, JWKS fetching, JWK conversion
shared.data       database engines and units of work, migrations, Redis clients,
                  background jobs (the worker)
shared.config     settings from the environment, clocks, text rules
"""
