"""Access tokens: verification, JWKS fetching, JWK conversion."""
