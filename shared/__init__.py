"""Code common to both services: settings, errors, tokens, interceptors, server bootstrap."""
