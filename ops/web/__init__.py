"""The installer's and operator's web page, served by the station itself.

``server.web_service`` (a supervisor service) runs ``app.WebApp``, a
hand-written ASGI app, on hypercorn's trio worker; ``auth`` keeps the
installer password, sessions and CSRF tokens; ``pages`` renders the HTML;
``metrics`` is the Prometheus endpoint; ``monitor`` the fault and plot rings.
"""
