"""Development helpers, apart from the runtime: a throwaway redis-server (``redis_server``)
and the instrumented demo shop that ``backflow demo`` and the tests send spans from
(``demo``)."""
