"""qwen-gateway: an OpenAI-compatible gateway that keeps per-task SLAs for one Qwen model on vLLM.

Module layers, top to bottom; a module imports only from the rows below its own:

    __main__     command line: settings, logging, uvicorn
    app          routes and lifespan: composes the rest
    routes       the completion endpoints: one owner per request, HTTP in and out
    response_stream  a chat stream retold as Responses API events
    responses    the Responses API: its request as a chat request, a chat answer as a Response
    response_items  a Response's output items and usage
    runtime      the long-lived parts    pipeline   two-step tasks (assist) as two serving calls
    serving      one task step: queue, count, call with failover, relay or collect, pause/resume
    calls        one upstream call's pieces         admission  degrade; refuse what cannot make it
    lifecycle    the owner of a request's resources and its record
    dispatch     asyncio glue around the scheduler  resume     continue a paused generation
    shared_limits  tenants' limits across gateways (Redis)  leases  windows split across gateways
    limits_script  the shared limits' Redis script: check and take, atomically
    membership   an upstream added, drained or forgotten in every part that knows of it
    sizing       each upstream's window size: fixed, or from its controller and measurements
    history      the status page's last minutes: points sampled into a bounded ring
    status       /status data    shutdown  draining on SIGTERM
    roster       the upstreams file kept in step: reload, resolve, add, drain, forget
    scrape       vLLM's /metrics: its load, its decode pace
    scheduler    pure queueing, dispatch and preemption decisions
    preemption   who gives way: shed, late, paused   timers   queued tickets' deadlines
    overflow     when an overflow upstream may take a request
    tickets      the scheduler's vocabulary: a request's place, a window, the decisions
    auth         API keys and tenant limits   steps   a step and its results   upstreams  health
    input_limit  per-task input budgets       queues  class queues, completion rate
    upstreams_file  the upstreams file's entries, validated
    protocol     OpenAI wire format   chunks  a stream put back together   exchange  a record
    config       the task table   fields  a request's knobs   sse  event framing   outbound  HTTP
    window       the adaptive window controller (pure logic, explicit clock)
    classes  errors  metrics  settings  breaker  middleware  estimates  recent
    routing      which upstream with room a request takes: task affinity or least-loaded
    window_tuning  the adaptive window's settings and reports    shared  the Redis link
    fairness     tenants' token shares of a class (virtual counters) and the stream meter
"""
