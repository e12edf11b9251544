"""Deployment: ``mono export`` (a release-layout folder with HF remote code, :mod:`mono.deploy.export`), the
remote-code bundler (:mod:`mono.deploy.remote_code`), ``mono serve`` and the LMDeploy integration.

Nothing is imported here: each command imports its own module when it runs.
"""
