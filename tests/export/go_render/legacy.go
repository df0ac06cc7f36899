package main

// Ollama 0.9's template data (api/types.go and template/template.go at github.com/ollama/ollama v0.9.0, the first
// with .Thinking and .IsThinkSet): narrower types than today's, so that a template reading a newer field (a tool
// property's anyOf, properties or required; a message's tool_name) fails here as it would fail there.

type legacyProperty struct {
	Type        PropertyType
	Items       any
	Description string
	Enum        []any
}

type legacyParameters struct {
	Type       string
	Defs       any
	Items      any
	Required   []string
	Properties map[string]legacyProperty
}

type legacyFunction struct {
	Name        string
	Description string
	Parameters  legacyParameters
}

type legacyTool struct {
	Type     string
	Function legacyFunction
}

type legacyCallFunction struct {
	Index     int
	Name      string
	Arguments templateArgs
}

type legacyToolCall struct{ Function legacyCallFunction }

type legacyMessage struct {
	Role      string
	Content   string
	Thinking  string
	ToolCalls []legacyToolCall
}

func legacyData(msgs []*templateMessage, tools []Tool) ([]*legacyMessage, []legacyTool) {
	var out []*legacyMessage
	for _, m := range msgs {
		lm := &legacyMessage{Role: m.Role, Content: m.Content, Thinking: m.Thinking}
		for _, c := range m.ToolCalls {
			lm.ToolCalls = append(lm.ToolCalls, legacyToolCall{Function: legacyCallFunction{
				Index: c.Function.Index, Name: c.Function.Name, Arguments: c.Function.Arguments}})
		}
		out = append(out, lm)
	}
	var lts []legacyTool
	for _, t := range tools {
		p := t.Function.Parameters
		lp := legacyParameters{Type: p.Type, Defs: p.Defs, Items: p.Items, Required: p.Required,
			Properties: map[string]legacyProperty{}}
		for name, prop := range p.Properties {
			lp.Properties[name] = legacyProperty{Type: prop.Type, Items: prop.Items, Description: prop.Description,
				Enum: prop.Enum}
		}
		lts = append(lts, legacyTool{Type: t.Type, Function: legacyFunction{Name: t.Function.Name,
			Description: t.Function.Description, Parameters: lp}})
	}
	return out, lts
}
