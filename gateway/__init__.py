"""qwen-gateway: an OpenAI-compatible gateway that keeps per-task SLAs for one Qwen model on vLLM.

Module layers, imports pointing down only (a request's path is the left column):

    __main__     command line: settings, logging, uvicorn
    app          routes, lifespan: composes the rest                middleware  request ids
    routes       the completion endpoints: one owner per request, HTTP in and out
    pipeline     two-step tasks (assist) as two serving calls
    runtime      the long-lived parts, built in the lifespan      status      /status data
    serving      one task step: queue, count, call, relay/collect   recent    finished rings
    lifecycle    the owner of a request's resources and its record
    input_limit  per-task input budgets   chunks  a stream put back together as one answer
    dispatch     asyncio glue around the scheduler    upstreams   health of the vLLM servers
    auth         API keys and tenant limits           scrape      vLLM's /metrics
    scheduler    pure queueing/dispatch logic         outbound    all outbound HTTP
    exchange     one request's record                 metrics     Prometheus names
    protocol     OpenAI wire format                   sse         event framing
    config       the task table                       settings    process settings
    classes      priority classes and vLLM's scale    errors      the error envelope
"""
