"""The app's core, one package per concern.

Imports point one way, down this list (tests/test_layout.py checks it):

    errors       every error the app produces, in the contract's codes
    platform     storage and platform seams
    directory    events, their catalogs, attendees and keys
    access       who is calling
    governance   what is allowed and what is counted
    upstreams    the deployments behind the proxy
    plugins      operators' own request checks and usage sinks, and the shipped ones
    runtime      the long-lived objects of one process, built from the packages above
    pipeline     the proxy's request path
    web          pages, public routes and self-registration
    management   the organisers' API, the table of every HTTP route, the timers' work
"""
