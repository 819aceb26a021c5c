"""Tool definitions shared by the template tests (written the way Ollama prints them: keys in its
struct field order, property names sorted)."""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询城市的实时天气",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {
                "city": {"type": "string", "description": "城市名，例如：北京"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "description": "查询时区的当前时间",
                 "parameters": {"type": "object", "required": ["tz"], "properties": {"tz": {"type": "string"}}}},
}
