"""qwen-gateway: an OpenAI-compatible gateway that keeps per-task SLAs for one Qwen model on vLLM.

Module layers, imports pointing down only:

    __main__     command line: settings, logging, uvicorn
    app          routes, lifespan, the request's outer shell      middleware  request ids
    pipeline     two-step tasks (assist)                          status      /status data
    proxy        one task step: budget, queue, upstream call, relay
    input_limit  per-task input budgets (count, refuse, truncate)
    runtime      the long-lived parts, built in the lifespan
    dispatch     asyncio glue around the scheduler    upstreams   health of the vLLM servers
    auth         API keys and tenant limits           scrape      vLLM's /metrics
    scheduler    pure queueing/dispatch logic         upstream    all outbound HTTP
    exchange     one request's record                 metrics     Prometheus names
    protocol     OpenAI wire format                   sse         event framing
    config       the task table                       settings    process settings
    classes      priority classes and vLLM's scale    errors      the error envelope
"""
