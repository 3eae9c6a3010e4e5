"""Memory-R1 agents: prompts, the memory construction pipeline, the Answer Agent."""

from mr1.agents.answer import AnswerAgent, AnswerResult, ParsedAnswer, parse_answer
from mr1.agents.pipeline import (ConversationMemory, MemoryBuilder, PipelineConfig,
                                 SpeakerMemory, build_all, load_memory, save_memory)

__all__ = ["AnswerAgent", "AnswerResult", "ParsedAnswer", "parse_answer", "ConversationMemory",
           "MemoryBuilder", "PipelineConfig", "SpeakerMemory", "build_all", "load_memory",
           "save_memory"]
